{{/* Names and labels. */}}
{{- define "braid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "braid.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "braid.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "braid.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "braid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "braid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "braid.labels" -}}
{{ include "braid.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "braid.secretName" -}}
{{- .Values.secret.existingSecret | default (printf "%s-secret" (include "braid.fullname" .)) -}}
{{- end -}}

{{/* The worker groups that are on: the default one, then the enabled additional ones. */}}
{{- define "braid.workerGroups" -}}
{{- $groups := list .Values.worker -}}
{{- range $name, $group := .Values.additionalWorkerGroups -}}
{{- if $group.enabled -}}
{{- $groups = append $groups (merge (dict "groupName" $name) $group) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "groups" $groups) -}}
{{- end -}}

{{/* Model replicas in all: pods x braidReplicasPerPod, summed over the worker groups. */}}
{{- define "braid.numReplicas" -}}
{{- $n := 0 -}}
{{- range (fromYaml (include "braid.workerGroups" .)).groups -}}
{{- $n = add $n (mul .pods .braidReplicasPerPod) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{/* Environment of every Ray container: Ray's token auth and Braid's API keys. */}}
{{- define "braid.env" -}}
- name: RAY_AUTH_MODE
  value: {{ ternary "token" "disabled" .Values.rayAuth.enabled | quote }}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "braid.secretName" . }}
      key: auth_token
{{- end }}
- name: BRAID_API_KEYS_FILE
  value: /etc/braid/api_keys
{{- end -}}

{{- define "braid.volumeMounts" -}}
- name: api-keys
  mountPath: /etc/braid
  readOnly: true
{{- if ne .root.Values.model.volume.type "none" }}
- name: model
  mountPath: {{ .root.Values.model.volume.mountPath }}
  readOnly: true
{{- end }}
{{- if .job }}
- name: data
  mountPath: /data
{{- end }}
{{- end -}}

{{- define "braid.volumes" -}}
- name: api-keys
  secret:
    secretName: {{ include "braid.secretName" .root }}
    items:
      - key: api_keys
        path: api_keys
{{- $volume := .root.Values.model.volume }}
{{- if eq $volume.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is required when model.volume.type is pvc" $volume.claimName }}
    readOnly: true
{{- else if eq $volume.type "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.volume.hostPath is required when model.volume.type is hostPath" $volume.hostPath }}
    type: Directory
{{- else if ne $volume.type "none" }}
{{- fail (printf "model.volume.type must be none, pvc or hostPath, not %q" $volume.type) }}
{{- end }}
{{- if .job }}
- name: data
  persistentVolumeClaim:
    claimName: {{ required "job.claimName is required when job.enabled" .root.Values.job.claimName }}
{{- end }}
{{- end -}}

{{/* A pod's scheduling fields. */}}
{{- define "braid.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The RayCluster spec shared by the RayService and the RayJob.
Context: (dict "root" $ "job" bool): the job's head (where its driver runs) mounts the data volume.
*/}}
{{- define "braid.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $image := printf "%s:%s" $root.Values.image.repository $root.Values.image.tag -}}
{{- $braid := $root.Values.braid -}}
rayVersion: {{ $root.Values.rayVersion | quote }}
enableInTreeAutoscaling: false
headGroupSpec:
  serviceType: {{ $root.Values.head.serviceType }}
  rayStartParams:
    {{- $head := dict "num-cpus" "0" "num-gpus" "0" "dashboard-host" "0.0.0.0" "metrics-export-port" "8080" "resources" "\"{\\\"braid_ingress\\\": 1}\"" }}
    {{- toYaml (merge (deepCopy $root.Values.head.rayStartParams) $head) | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "braid.selectorLabels" $root | nindent 8 }}
        braid.dev/role: head
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "braid.env" $root | nindent 12 }}
          ports:
            - {containerPort: 6379, name: gcs-server}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
            - {containerPort: 8000, name: serve}
            - {containerPort: 8080, name: metrics}
            - {containerPort: {{ $braid.metricsPort }}, name: braid-ingress}
          resources:
            {{- toYaml $root.Values.head.resources | nindent 12 }}
          volumeMounts:
            {{- include "braid.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "braid.volumes" . | nindent 8 }}
      {{- with include "braid.scheduling" $root.Values.head }}{{ . | nindent 6 }}{{ end }}
workerGroupSpecs:
{{- range (fromYaml (include "braid.workerGroups" $root)).groups }}
  {{- $k := int .braidReplicasPerPod }}
  {{- $gpus := mul $k (int $braid.gpusPerReplica) }}
  {{- $params := dict "metrics-export-port" "8080" "num-gpus" (toString $gpus) }}
  {{- if eq $gpus 0 }}
  {{- $_ := set $params "num-cpus" (toString (mulf $k $braid.cpusPerReplica)) }}
  {{- end }}
  {{- $resources := deepCopy .resources }}
  {{- if gt $gpus 0 }}
  {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) ($resources.requests | default dict)) }}
  {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) ($resources.limits | default dict)) }}
  {{- end }}
  - groupName: {{ .groupName }}
    replicas: {{ .pods }}
    minReplicas: {{ .pods }}
    maxReplicas: {{ .pods }}
    rayStartParams:
      {{- toYaml (merge (deepCopy (.rayStartParams | default dict)) $params) | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "braid.selectorLabels" $root | nindent 10 }}
          braid.dev/role: worker
      spec:
        {{- with $root.Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ $image }}
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            env:
              {{- include "braid.env" $root | nindent 14 }}
            ports:
              - {containerPort: 8080, name: metrics}
              {{- range $i := until $k }}
              - {containerPort: {{ add $braid.metricsPort 1 $i }}, name: braid-r{{ add 1 $i }}}
              {{- end }}
            resources:
              {{- toYaml $resources | nindent 14 }}
            volumeMounts:
              {{- include "braid.volumeMounts" (dict "root" $root "job" false) | nindent 14 }}
        volumes:
          {{- include "braid.volumes" (dict "root" $root "job" false) | nindent 10 }}
        {{- with include "braid.scheduling" . }}{{ . | nindent 8 }}{{ end }}
{{- end }}
{{- end -}}

{{/* Braid's Serve application (serveConfigV2): cluster.serve:build with ClusterConfig fields. */}}
{{- define "braid.serveConfig" -}}
{{- $braid := .Values.braid -}}
{{- $d := $braid.defaults -}}
{{- $defaults := dict -}}
{{- range $key, $name := dict "protocol" "protocol" "joinPolicy" "join_policy" "maxLatencyS" "max_latency_s" "maxThreads" "max_threads" "maxDepth" "max_depth" -}}
{{- if not (kindIs "invalid" (index $d $key)) -}}
{{- $_ := set $defaults $name (index $d $key) -}}
{{- end -}}
{{- end -}}
{{- $args := dict "model_path" $braid.modelPath "num_replicas" (int (include "braid.numReplicas" .)) "replica_gpus" $braid.gpusPerReplica "replica_cpus" $braid.cpusPerReplica "kv_cache_bytes" $braid.kvCacheBytes "task" $braid.task "capacity" $braid.capacity "kv_transfer" $braid.kvTransfer "retry_within_s" $braid.retryWithinS "request_timeout_s" $braid.requestTimeoutS "max_requests" $braid.maxRequests "policy" $braid.policy "max_step_threads" $braid.maxStepThreads "metrics_port" $braid.metricsPort "metrics_host" $braid.metricsHost "max_in_flight_per_key" $braid.maxInFlightPerKey "defaults" $defaults -}}
{{- range $name, $value := dict "served_model_name" $braid.servedModelName "dtype" $braid.dtype "verifier" $braid.verifier -}}
{{- if $value -}}
{{- $_ := set $args $name $value -}}
{{- end -}}
{{- end -}}
{{- $deployment := dict "name" "BraidAPI" "ray_actor_options" (dict "num_cpus" 0 "resources" (dict "braid_ingress" 0.01)) -}}
{{- $app := dict "name" "braid" "route_prefix" "/" "import_path" "cluster.serve:build" "args" $args "deployments" (list $deployment) -}}
{{- toYaml (dict "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app)) -}}
{{- end -}}
