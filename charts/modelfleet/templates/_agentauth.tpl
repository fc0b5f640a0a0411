{{/*
How the operator authenticates to the agents: the file its token is read from, and the volume
that holds it. mode tokenreview: a projected ServiceAccount token of the operator for the agents'
audience, short-lived and rotated by the kubelet (the operator re-reads the file); the agents
check it with a TokenReview and accept only the operator's ServiceAccount. mode token: the
chart's (or an existing) Secret, key "token", mounted into the operator and the agents.
*/}}
{{- define "modelfleet.agentTokenPath" -}}
{{- if ne .Values.agent.auth.mode "none" -}}
/var/run/modelfleet/agent-auth/token
{{- end -}}
{{- end -}}

{{- define "modelfleet.agentTokenVolume" -}}
{{- if eq .Values.agent.auth.mode "token" }}
- name: agent-auth
  secret:
    secretName: {{ include "modelfleet.agentTokenSecret" . }}
    defaultMode: 0440
    items:
      - key: token
        path: token
{{- else if eq .Values.agent.auth.mode "tokenreview" }}
- name: agent-auth
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          audience: {{ .Values.agent.auth.audience }}
          expirationSeconds: 3600
          path: token
{{- end }}
{{- end -}}

{{/* The username of the operator's ServiceAccount, as TokenReviews report it. */}}
{{- define "modelfleet.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "modelfleet.serviceAccountName" (dict "ctx" . "component" "operator")) -}}
{{- end -}}
