"""The code MLflow stores with every registered gaussad model ("model from code") and runs on load.

Each registered version keeps its own copy of this file, so what it imports is frozen in users'
registries: it imports one name, gaussad.serving.GaussadModel, which stays where it is.
"""

import mlflow
from gaussad.serving import GaussadModel

mlflow.models.set_model(GaussadModel())
