{{/* Chart name. */}}
{{- define "samgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart unless overridden. */}}
{{- define "samgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "samgate.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "samgate.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "samgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "samgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "samgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "samgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret holding credentials. */}}
{{- define "samgate.secretName" -}}
{{- if .Values.secret.create -}}
{{- include "samgate.fullname" . -}}
{{- else -}}
{{- required "secret.existingSecret is required when secret.create is false" .Values.secret.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The port of config.run.http_listen. */}}
{{- define "samgate.httpPort" -}}
{{- $listen := (.Values.config.run | default dict).http_listen | default "0.0.0.0:9464" -}}
{{- last (splitList ":" $listen) -}}
{{- end -}}

{{/* `samgate feed`: its own name and selector (never matched by the pipeline's Deployment). */}}
{{- define "samgate.feedName" -}}
{{- printf "%s-feed" (include "samgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "samgate.feedSelectorLabels" -}}
app.kubernetes.io/name: {{ include "samgate.name" . }}-feed
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "samgate.feedLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "samgate.feedSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: feed
{{- end -}}
