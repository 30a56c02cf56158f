{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "bloomrun-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object's name: the release name, plus the chart name unless one already contains the other. */}}
{{- define "bloomrun-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- /* release "bloomrun" of chart "bloomrun-operator": "bloomrun-operator", not "bloomrun-bloomrun-operator" */}}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "bloomrun-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bloomrun-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bloomrun-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bloomrun-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bloomrun
{{- end }}

{{- define "bloomrun-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bloomrun-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bloomrun-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Namespaced mode: the operator watches only .Values.watchNamespaces. */}}
{{- define "bloomrun-operator.namespaced" -}}
{{- if .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Peering is needed only when several replicas could reconcile the same object. */}}
{{- define "bloomrun-operator.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* The command line of bloomrun/operator/__main__.py: endpoints, peering mode and the namespaces to serve. */}}
{{- define "bloomrun-operator.args" -}}
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
- --metrics-port={{ .Values.metrics.port }}
- --trainer-image={{ printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- if include "bloomrun-operator.peering" . }}
- --peering={{ include "bloomrun-operator.peeringName" . }}
{{- else }}
- --standalone
{{- end }}
{{- /* No --namespace at all means every namespace. */}}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- end }}

{{- define "bloomrun-operator.peeringName" -}}
{{- default (include "bloomrun-operator.fullname" .) .Values.peering.name }}
{{- end }}
