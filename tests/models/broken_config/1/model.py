"""Never loads: its config.pbtxt is not valid text protobuf."""


class TritonPythonModel:
    def execute(self, requests):
        return []
