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

{{/* The operator's ServiceAccount. One the chart does not create must be named: falling back
to the namespace's `default` account would hand the operator's rights (cluster-wide ones in
cluster-wide mode) to every pod of the release namespace that runs as `default`. */}}
{{- define "bloomrun-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bloomrun-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: the operator would otherwise run as, and bind its rights to, the namespace's default ServiceAccount" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: repository@digest when a digest is given, else repository:tag (the
chart's appVersion by default). Takes an image's values (repository, tag, digest) and the chart. */}}
{{- define "bloomrun-operator.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "bloomrun-operator.image" -}}
{{- include "bloomrun-operator.imageRef" (dict "image" .Values.image "chart" .Chart) }}
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
- --trainer-image={{ include "bloomrun-operator.imageRef" (dict "image" .Values.trainerImage "chart" .Chart) }}
- --max-nodes={{ int .Values.runPolicy.maxNodes }}
- --allowed-priority-classes={{ join "," .Values.runPolicy.allowedPriorityClasses }}
- --denied-taint-keys={{ join "," .Values.runPolicy.deniedTaintKeys }}
- --denied-node-label-keys={{ join "," .Values.runPolicy.deniedNodeLabelKeys }}
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
