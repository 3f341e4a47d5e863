{{/*
Names and labels. Every component (today the webhook; later the exporter) gets its objects'
names and pod labels from here, given the component's name, so a new component is one template
file and one values block.
*/}}

{{/* The chart's name, 63 characters at most (a label value). */}}
{{- define "ltw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: the release name when it already contains the chart's name
(release `lightstep-tekton-webhook` gives the names manifests/base uses), else release-chart.
*/}}
{{- define "ltw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A component's name: the full name for the webhook (so existing installs keep their object
names), full name and component for the others. Call with (dict "root" $ "component" "webhook").
*/}}
{{- define "ltw.componentName" -}}
{{- $full := include "ltw.fullname" .root -}}
{{- if eq .component "webhook" -}}
{{- $full -}}
{{- else -}}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
The selector of a component's pods. Only app.kubernetes.io/name, set to the component's name:
a Deployment's selector cannot change after it is created, and this is the selector installs from
manifests/base have always had. Each component has its own name, so no selector picks up another
component's pods.
*/}}
{{- define "ltw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ltw.componentName" . }}
{{- end -}}

{{/* Labels on every object of a component (and on its pods). */}}
{{- define "ltw.labels" -}}
{{ include "ltw.selectorLabels" . }}
app.kubernetes.io/part-of: lightstep-tekton
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The image reference: the digest pins it when given, else the tag (default appVersion). */}}
{{- define "ltw.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the serving certificate, in every certificate mode. */}}
{{- define "ltw.tlsSecretName" -}}
{{- if and (eq .Values.certs.mode "secret") .Values.certs.secret.name -}}
{{- .Values.certs.secret.name -}}
{{- else -}}
{{- printf "%s-tls" (include "ltw.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The names the API server and the helm test pod dial, which the serving certificate covers. */}}
{{- define "ltw.dnsNames" -}}
{{- $service := include "ltw.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns) | toJson -}}
{{- end -}}

{{/*
The token Secret's name and key, from the policy's token reference (the lightstep profile's
defaults when the policy leaves them out).
*/}}
{{- define "ltw.tokenSecretName" -}}
{{- $token := .Values.policy.token | default dict -}}
{{- $token.secretName | default "lightstep-access-token" -}}
{{- end -}}
{{- define "ltw.tokenSecretKey" -}}
{{- $token := .Values.policy.token | default dict -}}
{{- $token.secretKey | default "access-token" -}}
{{- end -}}

{{/*
The pod-scheduling fields of a component's pod spec, from its values block (webhook.*), as YAML
(empty when none is set). Call with (dict "root" $ "component" "webhook" "values" .Values.webhook).
*/}}
{{- define "ltw.podScheduling" -}}
{{- $values := .values -}}
{{- $fields := dict -}}
{{- range $key := list "priorityClassName" "nodeSelector" "tolerations" "affinity" -}}
{{- with index $values $key }}{{ $_ := set $fields $key . }}{{ end -}}
{{- end -}}
{{- $spread := list -}}
{{- range $values.topologySpreadConstraints -}}
{{- $constraint := deepCopy . -}}
{{- if not (hasKey $constraint "labelSelector") -}}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "ltw.selectorLabels" $ | fromYaml)) -}}
{{- end -}}
{{- $spread = append $spread $constraint -}}
{{- end -}}
{{- with $spread }}{{ $_ := set $fields "topologySpreadConstraints" . }}{{ end -}}
{{- with $fields }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* Fails the render when values contradict each other (the schema checks each value alone). */}}
{{- define "ltw.validate" -}}
{{- if not (or .Values.webhooks.inject.enabled .Values.webhooks.enforce.enabled) -}}
{{- fail "webhooks: enable at least one of webhooks.inject and webhooks.enforce; without either the chart installs a webhook nothing calls" -}}
{{- end -}}
{{- if .Values.token.create -}}
{{- if not .Values.token.value -}}
{{- fail "token.value: required when token.create is true" -}}
{{- end -}}
{{- if not .Values.token.namespaces -}}
{{- fail "token.namespaces: list the namespaces to create the token Secret in (pods read it from their own namespace)" -}}
{{- end -}}
{{- $profile := .Values.policy.profile | default "lightstep" -}}
{{- if and (not .Values.policy.token) (ne $profile "lightstep") -}}
{{- fail "token.create: the policy has no token reference (policy.token), so steps would never read the Secret" -}}
{{- end -}}
{{- end -}}
{{- end -}}
