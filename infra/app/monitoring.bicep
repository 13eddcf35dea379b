// Log Analytics (workspace and Application Insights, both without local auth: Entra ID only), the
// ServiceDesk_CL / ServiceDeskLog_CL tables of the retired ITSM connector, and the data collection
// endpoint and rule the sync sends them through (docs/log-analytics.md defines the same tables).
param workspaceName string
param appInsightsName string
param dataCollectionEndpointName string
param dataCollectionRuleName string
param location string
param tags object = {}
param retentionInDays int = 90

var serviceDeskColumns = [
  { name: 'TimeGenerated', type: 'datetime' }
  { name: 'ServiceDeskConnectionName_s', type: 'string' }
  { name: 'ServiceDeskWorkItemType_s', type: 'string' }
  { name: 'ServiceDeskId_s', type: 'string' }
  { name: 'ServiceDeskSysId_s', type: 'string' }
  { name: 'Urgency_s', type: 'string' }
  { name: 'Impact_s', type: 'string' }
  { name: 'Priority_s', type: 'string' }
  { name: 'CreatedBy_s', type: 'string' }
  { name: 'ClosedBy_s', type: 'string' }
  { name: 'Source_s', type: 'string' }
  { name: 'AssignedTo_s', type: 'string' }
  { name: 'Category_s', type: 'string' }
  { name: 'Title_s', type: 'string' }
  { name: 'Description_s', type: 'string' }
  { name: 'CreatedDate_t', type: 'datetime' }
  { name: 'ClosedDate_t', type: 'datetime' }
  { name: 'LastModifiedDate_t', type: 'datetime' }
  { name: 'Computer', type: 'string' }
  { name: 'IncidentState_s', type: 'string' }
  { name: 'ResolvedBy_s', type: 'string' }
  { name: 'ResolvedDate_t', type: 'datetime' }
  { name: 'CRState_s', type: 'string' }
  { name: 'Type_s', type: 'string' }
  { name: 'Risk_s', type: 'string' }
  { name: 'RequestedDate_t', type: 'datetime' }
  { name: 'PlannedStartDate_t', type: 'datetime' }
  { name: 'PlannedEndDate_t', type: 'datetime' }
  { name: 'WorkStartDate_t', type: 'datetime' }
  { name: 'WorkEndDate_t', type: 'datetime' }
]
var serviceDeskLogColumns = [
  { name: 'TimeGenerated', type: 'datetime' }
  { name: 'ServiceDeskConnectionName_s', type: 'string' }
  { name: 'ServiceDeskWorkItemType_s', type: 'string' }
  { name: 'Kind_s', type: 'string' }
  { name: 'SourceId_s', type: 'string' }
  { name: 'Message_s', type: 'string' }
  { name: 'RunId_s', type: 'string' }
]

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
    features: { disableLocalAuth: true }
  }
}

resource serviceDeskTable 'Microsoft.OperationalInsights/workspaces/tables@2022-10-01' = {
  parent: workspace
  name: 'ServiceDesk_CL'
  properties: {
    schema: { name: 'ServiceDesk_CL', columns: serviceDeskColumns }
    retentionInDays: retentionInDays
  }
}

resource serviceDeskLogTable 'Microsoft.OperationalInsights/workspaces/tables@2022-10-01' = {
  parent: workspace
  name: 'ServiceDeskLog_CL'
  properties: {
    schema: { name: 'ServiceDeskLog_CL', columns: serviceDeskLogColumns }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

resource dataCollectionEndpoint 'Microsoft.Insights/dataCollectionEndpoints@2022-06-01' = {
  name: dataCollectionEndpointName
  location: location
  tags: tags
  properties: {
    networkAcls: { publicNetworkAccess: 'Enabled' }
  }
}

resource dataCollectionRule 'Microsoft.Insights/dataCollectionRules@2022-06-01' = {
  name: dataCollectionRuleName
  location: location
  tags: tags
  dependsOn: [serviceDeskTable, serviceDeskLogTable]
  properties: {
    dataCollectionEndpointId: dataCollectionEndpoint.id
    streamDeclarations: {
      'Custom-ServiceDesk_CL': { columns: serviceDeskColumns }
      'Custom-ServiceDeskLog_CL': { columns: serviceDeskLogColumns }
    }
    destinations: {
      logAnalytics: [{ workspaceResourceId: workspace.id, name: 'workspace' }]
    }
    dataFlows: [
      {
        streams: ['Custom-ServiceDesk_CL']
        destinations: ['workspace']
        transformKql: 'source'
        outputStream: 'Custom-ServiceDesk_CL'
      }
      {
        streams: ['Custom-ServiceDeskLog_CL']
        destinations: ['workspace']
        transformKql: 'source'
        outputStream: 'Custom-ServiceDeskLog_CL'
      }
    ]
  }
}

output workspaceId string = workspace.id
output appInsightsName string = appInsights.name
// not a secret (local auth is off, so it admits nothing without an Entra ID token); never a main output
output appInsightsConnectionString string = appInsights.properties.ConnectionString
output logsIngestionEndpoint string = dataCollectionEndpoint.properties.logsIngestion.endpoint
output dataCollectionRuleName string = dataCollectionRule.name
output dataCollectionRuleImmutableId string = dataCollectionRule.properties.immutableId
