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
The block servers' image (the CUDA build): repository:tag, the tag defaulting to the chart's appVersion.
*/}}
{{- define "llmswarm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The CPU build, for the chart's own pods and the route maps: repository:cpuTag, by default <appVersion>-cpu.
*/}}
{{- define "llmswarm.cpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.cpuTag) }}
{{- end }}

{{/*
"true" when the ServiceMonitor and PodMonitor may be created: the cluster serves the Prometheus Operator's API
(or metrics.forceMonitors).
*/}}
{{- define "llmswarm.monitoringApi" -}}
{{- if or .Values.metrics.forceMonitors (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
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

{{/*
NVIDIA_VISIBLE_DEVICES=void for the chart's containers: none asks for a GPU, and the CUDA image's "all" would
show them every GPU of a node whose default container runtime is NVIDIA's.
*/}}
{{- define "llmswarm.noGpuEnv" -}}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- end }}

{{/*
Namespaces the operator watches, comma separated ("" for every namespace): operator.settings.namespaces, else
the release namespace unless operator.clusterWide.
*/}}
{{- define "llmswarm.watchedNamespaces" -}}
{{- if .Values.operator.settings.namespaces }}
{{- join "," .Values.operator.settings.namespaces }}
{{- else if not .Values.operator.clusterWide }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Name of the Kopf peering object the operator's replicas share: operator.settings.peering, or the full name when
there is more than one replica ("" for a standalone operator).
*/}}
{{- define "llmswarm.peering" -}}
{{- if .Values.operator.settings.peering }}
{{- .Values.operator.settings.peering }}
{{- else if gt (int .Values.operator.replicaCount) 1 }}
{{- include "llmswarm.fullname" . }}
{{- end }}
{{- end }}

{{/*
Metadata of the uninstall hook's objects: pre-delete, replaced on the next uninstall, removed once it succeeded.
Call with (dict "context" $ "name" NAME "weight" "-10").
*/}}
{{- define "llmswarm.uninstallHookMetadata" -}}
name: {{ .name }}
namespace: {{ .context.Release.Namespace }}
labels:
  {{- include "llmswarm.labels" (dict "context" .context "component" "uninstall") | nindent 2 }}
annotations:
  helm.sh/hook: pre-delete
  helm.sh/hook-weight: {{ .weight | quote }}
  helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
