{{- define "disagg-operator.labels" -}}
app.kubernetes.io/name: disagg-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "disagg-operator.selectorLabels" -}}
app.kubernetes.io/name: disagg-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "disagg-operator.serviceAccountName" -}}
{{ default .Release.Name .Values.serviceAccount.name }}
{{- end }}
