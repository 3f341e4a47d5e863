{{/*
The Secret named .name in the release namespace as JSON, "{}" when absent. Only `lookup` reads
the cluster, and only through this template: `helm template` (no cluster) gets "{}", and
tests/chart.rs swaps this file for one that reads Secrets from files, to test what an upgrade
does with existing ones. Call with (dict "root" $ "name" NAME).
*/}}
{{- define "ltw.existingSecret" -}}
{{- lookup "v1" "Secret" .root.Release.Namespace .name | default dict | toJson -}}
{{- end -}}
