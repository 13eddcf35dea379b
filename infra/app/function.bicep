// The Flex Consumption plan and the Function App (Linux, Python). Storage is identity-based for the
// host (AzureWebJobsStorage__*) and for the state tables (STATE_TABLE_ENDPOINT); the deployment
// package lives in a blob container read with the same identity.
param name string
param planName string
param location string
param tags object = {}
param identityId string
param identityClientId string
param storageAccountName string
param deploymentContainerName string
param appInsightsConnectionString string
param keyVaultUri string
param tableEndpoint string
param logsIngestionEndpoint string
param dataCollectionRuleImmutableId string
param pythonVersion string = '3.11'
param alertMaxAttempts int = 5
param maximumInstanceCount int = 40
param instanceMemoryMB int = 2048

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: { name: 'python', version: pythonVersion }
    }
  }
}

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: {
    // the host's storage, identity-based (no key anywhere)
    AzureWebJobsStorage__accountName: storage.name
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    // the app's own Azure SDK clients (DefaultAzureCredential picks the user-assigned identity)
    AZURE_CLIENT_ID: identityClientId
    APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
    STATE_TABLE_ENDPOINT: tableEndpoint
    KEY_VAULT_URL: keyVaultUri
    LOGS_INGESTION_ENDPOINT: logsIngestionEndpoint
    LOGS_INGESTION_RULE_ID: dataCollectionRuleImmutableId
    LOGS_INGESTION_STREAM: 'Custom-ServiceDesk_CL'
    LOGS_INGESTION_ERROR_STREAM: 'Custom-ServiceDeskLog_CL'
    // one number for both: the app marks a delivery failed on its last attempt, before the host
    // would move the message to the poison queue
    ALERT_MAX_ATTEMPTS: string(alertMaxAttempts)
    AzureFunctionsJobHost__extensions__queues__maxDequeueCount: string(alertMaxAttempts)
  }
}

output name string = site.name
output id string = site.id
output defaultHostName string = site.properties.defaultHostName
