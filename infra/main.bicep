// The ITSM connector in one resource group: a Flex Consumption Function App (Linux, Python) with a
// user-assigned identity, storage without shared keys, Key Vault in RBAC mode, Log Analytics and
// Application Insights without local auth, the ServiceDesk_CL / ServiceDeskLog_CL tables with their
// data collection endpoint and rule, and (optionally) an action group that posts to the webhook.
// infra/main.json is the same template as ARM JSON; tests/unit/test_infra.py keeps the two in step.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; names and tags of every resource derive from it.')
param environmentName string

@minLength(1)
@description('Region of every resource; it must offer the Flex Consumption plan.')
@metadata({ azd: { type: 'location' } })
param location string

@description('Object id of the deployer (azd fills it): roles to run the CLI and func start against these resources. Empty: none.')
param principalId string = ''

@allowed(['User', 'ServicePrincipal', 'Group'])
param principalType string = 'User'

@description('Resource group name; default rg-<environmentName>.')
param resourceGroupName string = ''

@allowed(['3.11', '3.12'])
@description('Python version of the Flex Consumption runtime (the app is tested on 3.11).')
param pythonVersion string = '3.11'

@minValue(1)
@maxValue(50)
@description('Delivery attempts per alert; also the queue maxDequeueCount, so the host never gives up first.')
param alertMaxAttempts int = 5

@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@description('Create an action group whose webhook posts to the connection named by actionGroupConnection.')
param deployActionGroup bool = false

@description('Connection name in the action group\'s webhook URL (add the connection with the CLI).')
param actionGroupConnection string = ''

@description('Object id of the app registration for a Secure Webhook (empty: a plain webhook with the function key).')
param secureWebhookAppObjectId string = ''

@description('Application ID URI of that app registration (e.g. api://<client id>).')
param secureWebhookAppIdUri string = ''

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var functionAppName = 'func-itsm-${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-itsm-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'stitsm${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
  }
}

module keyVault 'app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-itsm-${take(resourceToken, 13)}'
    location: location
    tags: tags
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    workspaceName: 'log-itsm-${resourceToken}'
    appInsightsName: 'appi-itsm-${resourceToken}'
    dataCollectionEndpointName: 'dce-itsm-${resourceToken}'
    dataCollectionRuleName: 'dcr-itsm-${resourceToken}'
    location: location
    tags: tags
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    dataCollectionRuleName: monitoring.outputs.dataCollectionRuleName
    appInsightsName: monitoring.outputs.appInsightsName
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

module functionApp 'app/function.bicep' = {
  name: 'function'
  scope: rg
  dependsOn: [rbac]
  params: {
    name: functionAppName
    planName: 'plan-itsm-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    keyVaultUri: keyVault.outputs.uri
    tableEndpoint: storage.outputs.tableEndpoint
    logsIngestionEndpoint: monitoring.outputs.logsIngestionEndpoint
    dataCollectionRuleImmutableId: monitoring.outputs.dataCollectionRuleImmutableId
    pythonVersion: pythonVersion
    alertMaxAttempts: alertMaxAttempts
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

module actionGroup 'app/actiongroup.bicep' = if (deployActionGroup && !empty(actionGroupConnection)) {
  name: 'actiongroup'
  scope: rg
  params: {
    name: 'ag-itsm-${resourceToken}'
    functionAppName: functionApp.outputs.name
    connectionName: actionGroupConnection
    secureWebhookAppObjectId: secureWebhookAppObjectId
    secureWebhookAppIdUri: secureWebhookAppIdUri
    tags: tags
  }
}

// Outputs: names, endpoints and commands only. No key, secret or connection string.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output WEBHOOK_URL string = 'https://${functionApp.outputs.defaultHostName}/api/alerts/<connection>'
output HEALTH_URL string = 'https://${functionApp.outputs.defaultHostName}/api/health'
output KEY_VAULT_URL string = keyVault.outputs.uri
output STATE_TABLE_ENDPOINT string = storage.outputs.tableEndpoint
output LOGS_INGESTION_ENDPOINT string = monitoring.outputs.logsIngestionEndpoint
output LOGS_INGESTION_RULE_ID string = monitoring.outputs.dataCollectionRuleImmutableId
output FUNCTION_KEY_COMMAND string = 'az functionapp keys list -g ${rg.name} -n ${functionApp.outputs.name} --query functionKeys.default -o tsv'
output ADD_CONNECTION_COMMAND string = 'KEY_VAULT_URL=${keyVault.outputs.uri} STATE_TABLE_ENDPOINT=${storage.outputs.tableEndpoint} python -m shared_code connections add <connection> --type servicenow --url https://<instance>.service-now.com --user <integration user> --client-id <oauth client id> --test'
