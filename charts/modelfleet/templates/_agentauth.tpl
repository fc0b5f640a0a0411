{{/*
How the operator authenticates to the agents, as a volume and the path of the token file in it.
mode token: the chart's (or an existing) Secret, key "token". mode tokenreview: a projected
ServiceAccount token for the agents' audience, short-lived and rotated by the kubelet (the
operator reads the file for every poll round).
*/}}
{{- define "modelfleet.agentTokenPath" -}}
{{- if eq .Values.agent.auth.mode "none" -}}
{{- else -}}
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
