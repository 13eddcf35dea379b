// Optional: an action group whose webhook posts alerts (common alert schema) to one connection.
// With an app registration given it is a Secure Webhook (an Entra ID token on every call, checked
// by the app); the function key is in the URL either way, as the route's auth level demands.
param name string
param functionAppName string
param connectionName string
param secureWebhookAppObjectId string = ''
param secureWebhookAppIdUri string = ''
param tags object = {}

resource site 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

var secure = !empty(secureWebhookAppObjectId)
var webhookUri = 'https://${site.properties.defaultHostName}/api/alerts/${connectionName}?code=${listKeys('${site.id}/host/default', '2024-04-01').functionKeys.default}'

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: name
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'itsm'
    enabled: true
    webhookReceivers: [
      {
        name: 'itsm-${connectionName}'
        serviceUri: webhookUri
        useCommonAlertSchema: true
        useAadAuth: secure
        objectId: secure ? secureWebhookAppObjectId : null
        identifierUri: secure ? secureWebhookAppIdUri : null
        tenantId: secure ? subscription().tenantId : null
      }
    ]
  }
}

output id string = actionGroup.id
