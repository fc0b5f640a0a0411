{{/* The namespaced RBAC rules, shared by the ClusterRole and the per-namespace Roles. */}}
{{- define "modelfleet.operatorRules" -}}
# The operator's work: reconcile ModelDeployments (kopf adds its finalizer and progress
# annotations by patch).
- apiGroups: ["modelfleet.io"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch", "patch", "update"]
# Their status subresource: conditions, ready replicas, instances, observedGeneration.
- apiGroups: ["modelfleet.io"]
  resources: ["modeldeployments/status"]
  verbs: ["get", "patch", "update"]
# Replica Pods: created on the node placement chose, deleted on scale-down and eviction, labels
# patched; watched to rebuild state after a restart (state lives in the API, not in memory).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# One Service per ModelDeployment, kept in line with the spec and deleted with it.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Events about placements, evictions and errors on the ModelDeployments (kopf posts core
# events; both APIs are granted so either client works). get: a repeated Event is aggregated by
# reading it back and bumping its count, as kubectl and the kubelet do.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "get", "patch"]
# The same events through events.k8s.io/v1.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
{{- define "modelfleet.gatewayRules" -}}
# Which models exist and their balancing annotation; patch records the last request time and
# the demand for a model scaled to zero (annotations modelfleet.io/last-request-time and
# modelfleet.io/demand-time), which drive idle scale-down and LRU eviction, and the requests each
# gateway replica holds (held.modelfleet.io/<pod>), which the autoscaler reads.
- apiGroups: ["modelfleet.io"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch", "patch"]
# Replica Pods: their readiness and IPs are the routing table.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
{{- end -}}
