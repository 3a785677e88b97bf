"""execute raises: every request gets an error, the worker lives on."""


class TritonPythonModel:
    def execute(self, requests):
        raise ValueError("this model always fails")
