{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "clipqc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "clipqc.fullname" -}}
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

{{- define "clipqc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clipqc.labels" -}}
helm.sh/chart: {{ include "clipqc.chart" . }}
{{ include "clipqc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "clipqc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clipqc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "clipqc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clipqc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The worker's config as rendered into the ConfigMap: .Values.config with model.dir defaulting
to model.mountPath and http.listen to 0.0.0.0:<containerPort>.
*/}}
{{- define "clipqc.config" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- $model := deepCopy (default dict $cfg.model) }}
{{- if not $model.dir }}
{{- $_ := set $model "dir" .Values.model.mountPath }}
{{- end }}
{{- $_ := set $cfg "model" $model }}
{{- $http := deepCopy (default dict $cfg.http) }}
{{- if not $http.listen }}
{{- $_ := set $http "listen" (printf "0.0.0.0:%d" (int .Values.containerPort)) }}
{{- end }}
{{- $_ := set $cfg "http" $http }}
{{- toYaml $cfg }}
{{- end }}

{{/* Drain timeout in whole seconds, rounded up (worker default 20000 ms). */}}
{{- define "clipqc.drainSeconds" -}}
{{- $ms := int64 (dig "pipeline" "drain_timeout_ms" 20000 (default dict .Values.config)) }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/* terminationGracePeriodSeconds: computed, or the value set, refused when not above the drain. */}}
{{- define "clipqc.terminationGracePeriodSeconds" -}}
{{- $drain := int64 (include "clipqc.drainSeconds" .) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain (int64 .Values.terminationGraceMarginSeconds) }}
{{- else }}
{{- $set := int64 .Values.terminationGracePeriodSeconds }}
{{- if le $set $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than config.pipeline.drain_timeout_ms in seconds (%d): the worker needs the drain plus time to flush and commit before SIGKILL" $set $drain) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/* The replica bound of the autoscalers: min(autoscaling.maxReplicas, autoscaling.partitions). */}}
{{- define "clipqc.maxReplicas" -}}
{{- $max := int64 .Values.autoscaling.maxReplicas }}
{{- $partitions := int64 .Values.autoscaling.partitions }}
{{- $cap := min $max $partitions }}
{{- if gt (int64 .Values.autoscaling.minReplicas) $cap }}
{{- fail (printf "autoscaling.minReplicas (%d) is above min(autoscaling.maxReplicas, autoscaling.partitions) = %d" (int64 .Values.autoscaling.minReplicas) $cap) }}
{{- end }}
{{- $cap }}
{{- end }}

{{- define "clipqc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
