"""initialize raises: the model is UNAVAILABLE with this reason."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("cannot initialize on purpose")

    def execute(self, requests):
        return []
