{{/*
Names, labels and small shared pieces. Every object carries the standard labels; the selector
labels are the stable subset (name, instance, component) that never changes across upgrades.
*/}}

{{/* The chart name, cut to 63 characters (a DNS label). */}}
{{- define "modelfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release-wide prefix of object names. A release named like the chart ("modelfleet") gets
plain names (modelfleet-operator) instead of modelfleet-modelfleet-operator. Cut to 46 characters
so that "<fullname>-default-deny" and the other suffixed names stay within 63.
*/}}
{{- define "modelfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* chart label value: name-version with "+" (not allowed in labels) replaced. */}}
{{- define "modelfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Standard labels. Call with (dict "ctx" $ "component" "operator"); component may be empty for
objects that belong to the whole release (the CRD, the default-deny NetworkPolicy).
*/}}
{{- define "modelfleet.labels" -}}
helm.sh/chart: {{ include "modelfleet.chart" .ctx }}
{{ include "modelfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Values.image.tag | default .ctx.Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: modelfleet
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels: never change them in an upgrade (Deployment selectors are immutable). */}}
{{- define "modelfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelfleet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* The modelfleet image reference; a digest wins over the tag. */}}
{{- define "modelfleet.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The default vLLM image reference handed to the operator. */}}
{{- define "modelfleet.vllmImage" -}}
{{- if .Values.vllmImage.digest -}}
{{- printf "%s@%s" .Values.vllmImage.repository .Values.vllmImage.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.vllmImage.repository .Values.vllmImage.tag -}}
{{- end -}}
{{- end -}}

{{/* ServiceAccount names; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "modelfleet.serviceAccountName" -}}
{{- $sa := index .ctx.Values .component "serviceAccount" -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "modelfleet.fullname" .ctx) .component) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the agent's bearer token (auth.mode=token). */}}
{{- define "modelfleet.agentTokenSecret" -}}
{{- default (printf "%s-agent-token" (include "modelfleet.fullname" .)) .Values.agent.auth.existingSecret -}}
{{- end -}}

{{/*
Namespaces the operator and the gateway act in: the listed watchNamespaces, or none (meaning
every namespace, through ClusterRoles).
*/}}
{{- define "modelfleet.watchNamespaces" -}}
{{- join "," (uniq .Values.watchNamespaces) -}}
{{- end -}}

{{/*
A ModelDeployment object name from a model name: lowercase, every run of characters outside
[a-z0-9-] turned into "-", trimmed of leading and trailing "-", at most 50 characters (replica
Pods are named <name>-instance-<n>). "gemma3-4B" -> "gemma3-4b", "Qwen/Qwen2.5 7B" -> "qwen-qwen2-5-7b".
*/}}
{{- define "modelfleet.modelObjectName" -}}
{{- $n := regexReplaceAll "[^a-z0-9]+" (lower .) "-" | trimAll "-" | trunc 50 | trimSuffix "-" -}}
{{- /* The object name is also the Service's: a DNS-1035 label, so it starts with a letter. */ -}}
{{- if regexMatch "^[0-9]" $n -}}
{{- $n = printf "m-%s" $n | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- if not $n -}}
{{- fail (printf "parallelModels: %q has no letter or digit to build an object name from; add `name: <dns-label>` to its entry" .) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* Pod-level scheduling fields shared by the workloads; call with the component's values. */}}
{{- define "modelfleet.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* A label selector string ("k=v,k=v", keys sorted) from a map of labels. */}}
{{- define "modelfleet.labelSelector" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/*
Deep merge of two maps, the second winning: maps merge key by key, anything else (lists, scalars,
including false and 0) is replaced. Sprig's mergeOverwrite would keep the base's value where the
override is false or 0 ("replicas: 0" must mean zero). Returns YAML; read it back with fromYaml.
*/}}
{{- define "modelfleet.merge" -}}
{{- $out := deepCopy (.base | default dict) -}}
{{- range $k, $v := .over -}}
{{- $cur := index $out $k -}}
{{- if and (kindIs "map" $v) (kindIs "map" $cur) -}}
{{- $_ := set $out $k (include "modelfleet.merge" (dict "base" $cur "over" $v) | fromYaml) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The operator's leader-election Lease. */}}
{{- define "modelfleet.leaseName" -}}
{{- printf "%s-operator" (include "modelfleet.fullname" .) -}}
{{- end -}}

{{/*
What the agent's pod needs on its platform to reach NVML (agent.platform, docs/install.md), as
YAML: runtimeClassName, privileged, driverHostPath (mounted at /usr/local/nvidia) and
nvidiaRuntime (the NVIDIA container runtime injects the driver: NVIDIA_VISIBLE_DEVICES is set).
The platform's choices apply to backend nvml only; agent.runtimeClassName and
agent.driverHostPath, when set, win over them (agent.securityContext.privileged, when set, wins
in the DaemonSet).
*/}}
{{- define "modelfleet.agentPlatform" -}}
{{- $agent := .Values.agent -}}
{{- $p := dict "runtimeClassName" "" "privileged" false "driverHostPath" "" "nvidiaRuntime" (eq $agent.backend "nvml") -}}
{{- if eq $agent.backend "nvml" -}}
{{- if eq $agent.platform "gpu-operator" -}}
{{- /* GPU Operator 25.10 and later configure CDI and leave runc the node's default runtime. */ -}}
{{- $_ := set $p "runtimeClassName" "nvidia" -}}
{{- else if eq $agent.platform "gke" -}}
{{- /* Google-managed drivers: no NVIDIA runtime; the driver is on the host, and privileged
reaches its devices. */ -}}
{{- $_ := set $p "privileged" true -}}
{{- $_ := set $p "driverHostPath" "/home/kubernetes/bin/nvidia" -}}
{{- $_ := set $p "nvidiaRuntime" false -}}
{{- else if eq $agent.platform "bottlerocket" -}}
{{- /* nvidia is the default runtime there, but it honours NVIDIA_VISIBLE_DEVICES in
privileged containers only. */ -}}
{{- $_ := set $p "privileged" true -}}
{{- end -}}
{{- end -}}
{{- with $agent.runtimeClassName -}}
{{- $_ := set $p "runtimeClassName" . -}}
{{- end -}}
{{- with $agent.driverHostPath -}}
{{- $_ := set $p "driverHostPath" . -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/*
The RuntimeClass of Shared replicas that name none: operator.sharedRuntimeClassName when set
(even ""), else the GPU Operator's `nvidia` on that platform and none elsewhere.
*/}}
{{- define "modelfleet.sharedRuntimeClassName" -}}
{{- $value := .Values.operator.sharedRuntimeClassName -}}
{{- if kindIs "string" $value -}}
{{- $value -}}
{{- else if eq .Values.agent.platform "gpu-operator" -}}
nvidia
{{- end -}}
{{- end }}
