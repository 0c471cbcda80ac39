# Custom Dataflow worker container: TensorFlow, tensorflow-transform and JAX are heavy to install on every worker,
# so they are baked in once. Build and push with your registry, then run jobs with
#   --sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/tokenminds-worker:TAG --sdk_location=container
# (See README "Running on Dataflow". Not built in CI: this machine has no Docker engine.)
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/tokenminds
COPY requirements.txt setup.py ./
RUN pip install --no-cache-dir -r requirements.txt

# The project's own packages, so workers need no --setup_file staging either.
COPY pipelines ./pipelines
COPY transforms ./transforms
COPY data_sources ./data_sources
COPY tokenminds_model ./tokenminds_model
RUN pip install --no-cache-dir --no-deps .

# The Beam SDK harness stays the entrypoint (inherited from the base image).
