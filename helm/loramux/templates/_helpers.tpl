{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "loramux.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "loramux.fullname" -}}
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

{{- define "loramux.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loramux.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loramux.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loramux.labels" -}}
helm.sh/chart: {{ include "loramux.chart" . }}
{{ include "loramux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: model-server
{{- end }}

{{- define "loramux.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loramux.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loramux.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret with the admin token and the API-keys file: the chart's or an existing one. */}}
{{- define "loramux.secretName" -}}
{{- default (include "loramux.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "loramux.adapterClaimName" -}}
{{- default (printf "%s-adapters" (include "loramux.fullname" .)) .Values.adapters.pvc.existingClaim }}
{{- end }}

{{- define "loramux.inferencePoolName" -}}
{{- default (include "loramux.fullname" .) .Values.router.inferencePool.name }}
{{- end }}

{{- define "loramux.eppName" -}}
{{- default (printf "%s-epp" (include "loramux.fullname" .)) .Values.router.inferencePool.endpointPicker.name }}
{{- end }}

{{/* Where the API-keys file is mounted, and the file the server reads. */}}
{{- define "loramux.apiKeysDir" -}}/etc/loramux/auth{{- end }}
{{- define "loramux.apiKeysFile" -}}
{{- printf "%s/%s" (include "loramux.apiKeysDir" .) .Values.auth.secretKeys.apiKeys }}
{{- end }}

{{/* The directory passed as --model, or nothing for the embedded default model. */}}
{{- define "loramux.modelPath" -}}
{{- if eq .Values.model.source "pvc" }}
{{- trimSuffix "/" (printf "/models/%s" .Values.model.pvc.path) }}
{{- else if eq .Values.model.source "init" }}
{{- trimSuffix "/" (printf "/models/%s" .Values.model.init.path) }}
{{- end }}
{{- end }}

{{/* TRITON_CACHE_DIR, under the cache mount. */}}
{{- define "loramux.tritonCacheDir" -}}
{{- printf "%s/triton" .Values.cache.mountPath }}
{{- end }}

{{/* "true" when the Triton cache gets a volume of its own: a claim of its own, or an emptyDir
when the cache itself is an emptyDir (a cache claim keeps the kernels already). */}}
{{- define "loramux.tritonCacheVolume" -}}
{{- if or .Values.tritonCache.existingClaim (not .Values.cache.existingClaim) }}true{{- end }}
{{- end }}

{{/* Pod termination: preStop sleep + the server's drain grace + 10 s to exit. */}}
{{- define "loramux.terminationGracePeriodSeconds" -}}
{{- add (int .Values.server.preStopSleepSeconds) (int .Values.server.shutdownGraceSeconds) 10 }}
{{- end }}

{{/* Value checks that a JSON schema cannot express across keys. */}}
{{- define "loramux.validate" -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and (eq .Values.model.source "init") (not .Values.model.init.image) }}
{{- fail "model.source=init needs model.init.image (the init container that fills /models)" }}
{{- end }}
{{- if and (eq .Values.adapters.mode "pvc") (not .Values.adapters.pvc.existingClaim) (not .Values.adapters.pvc.create) }}
{{- fail "adapters.mode=pvc needs adapters.pvc.existingClaim or adapters.pvc.create=true" }}
{{- end }}
{{- if and .Values.server.maxGpuAdapters (lt (int .Values.server.maxCpuAdapters) (int .Values.server.maxGpuAdapters)) }}
{{- fail "server.maxCpuAdapters must be at least server.maxGpuAdapters" }}
{{- end }}
{{- if and .Values.router.httpRoute.enabled (not .Values.router.inferencePool.enabled) }}
{{- fail "router.httpRoute.enabled needs router.inferencePool.enabled (the route's backend)" }}
{{- end }}
{{- if and .Values.router.httpRoute.enabled (not .Values.router.httpRoute.parentRefs) }}
{{- fail "router.httpRoute.enabled needs router.httpRoute.parentRefs (the Gateway)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas" }}
{{- end }}
{{- end }}

{{/* LORAMUX_ADAPTER: comma-separated NAME=PATH pairs, paths under the adapter root. */}}
{{- define "loramux.preloadList" -}}
{{- $root := .root }}
{{- $pairs := list }}
{{- range .items }}
{{- $pairs = append $pairs (printf "%s=%s/%s" .name $root (trimPrefix "/" .path)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
