{{/*
How the operator authenticates to the agents: the file its token is read from, and the volume
that holds it. mode token: the chart's (or an existing) Secret, key "token", mounted into the
operator and the agents. mode tokenreview: the operator's own ServiceAccount token (the agents
check it with a TokenReview against the API server's audience, the only one they check today).
*/}}
{{- define "modelfleet.agentTokenPath" -}}
{{- if eq .Values.agent.auth.mode "token" -}}
/var/run/modelfleet/agent-auth/token
{{- else if eq .Values.agent.auth.mode "tokenreview" -}}
/var/run/secrets/kubernetes.io/serviceaccount/token
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
{{- end }}
{{- end -}}
