{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "llmswarm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: the release name, plus the chart name unless the release name holds it already.
*/}}
{{- define "llmswarm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart-version, for the helm.sh/chart label.
*/}}
{{- define "llmswarm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select a component's pods: stable across upgrades (no chart or app version).
Call with (dict "context" $ "component" "operator").
*/}}
{{- define "llmswarm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmswarm.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Labels of every object of a component. Call with (dict "context" $ "component" "operator").
*/}}
{{- define "llmswarm.labels" -}}
helm.sh/chart: {{ include "llmswarm.chart" .context }}
{{ include "llmswarm.selectorLabels" . }}
app.kubernetes.io/version: {{ .context.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: llmswarm
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
{{- with .context.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The image of the chart's pods: repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "llmswarm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "llmswarm.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "llmswarm.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the swarm token ("" when there is no token).
*/}}
{{- define "llmswarm.tokenSecretName" -}}
{{- if .Values.token.existingSecret }}
{{- .Values.token.existingSecret }}
{{- else if .Values.token.create }}
{{- printf "%s-token" (include "llmswarm.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The LLMSWARM_TOKEN variable from the token Secret, for containers that talk to the swarm.
*/}}
{{- define "llmswarm.tokenEnv" -}}
{{- with include "llmswarm.tokenSecretName" . }}
- name: LLMSWARM_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.token.secretKey }}
{{- end }}
{{- end }}

{{/*
Name of the Swarm created from values: swarm.name, or the full name cut to the operator's 30 characters.
*/}}
{{- define "llmswarm.swarmName" -}}
{{- default (include "llmswarm.fullname" . | trunc 30 | trimSuffix "-") .Values.swarm.name }}
{{- end }}

{{/*
The Swarm whose route map the chart exposes, tests and points the gateway at ("" for none).
*/}}
{{- define "llmswarm.routeMapSwarm" -}}
{{- if .Values.routeMap.swarmName }}
{{- .Values.routeMap.swarmName }}
{{- else if .Values.swarm.create }}
{{- include "llmswarm.swarmName" . }}
{{- end }}
{{- end }}

{{/*
Port of that Swarm's route map: spec.routeMap.port of the Swarm from values, else routeMap.port.
*/}}
{{- define "llmswarm.routeMapPort" -}}
{{- if and .Values.swarm.create (not .Values.routeMap.swarmName) }}
{{- dig "routeMap" "port" 8700 .Values.swarm.spec }}
{{- else }}
{{- .Values.routeMap.port }}
{{- end }}
{{- end }}

{{/*
In-cluster URL of that route map: the Service the operator makes for the Swarm (<swarm>-routemap).
*/}}
{{- define "llmswarm.routeMapUrl" -}}
{{- $host := printf "%s-routemap.%s" (include "llmswarm.routeMapSwarm" .) .Release.Namespace }}
{{- with .Values.operator.settings.clusterDomain }}
{{- $host = printf "%s.%s" $host . }}
{{- end }}
{{- printf "http://%s:%v" $host (include "llmswarm.routeMapPort" .) }}
{{- end }}

{{/*
Port of the operator's liveness endpoint (from operator.settings.livenessEndpoint; "" when it is off).
*/}}
{{- define "llmswarm.healthPort" -}}
{{- with .Values.operator.settings.livenessEndpoint }}
{{- $url := urlParse . }}
{{- $parts := splitList ":" $url.host }}
{{- if lt (len $parts) 2 }}
{{- fail (printf "operator.settings.livenessEndpoint %q needs an explicit port (e.g. http://0.0.0.0:8080/healthz)" .) }}
{{- end }}
{{- last $parts }}
{{- end }}
{{- end }}

{{/*
Path of the operator's liveness endpoint.
*/}}
{{- define "llmswarm.healthPath" -}}
{{- with .Values.operator.settings.livenessEndpoint }}
{{- default "/" (urlParse .).path }}
{{- end }}
{{- end }}
