"""The fracture classifier: preprocessing, network, training, evaluation and inference."""
