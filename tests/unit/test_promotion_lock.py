"""The registry lock's race: its holder can let go between a failed create and the look at who holds it."""

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST

from pipelines.promotion import promotion_lock


class RegistryWhoseHolderLetsGo:
    """A registry where the lock exists at the first create and is gone by the next call."""

    def __init__(self) -> None:
        self.locked, self.calls = True, []

    def create_registered_model(self, name, tags, description):
        self.calls.append("create")
        if self.locked:
            self.locked = False  # the holder deletes it right after this refusal
            raise MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS)
        self.locked = True

    def get_registered_model(self, name):
        self.calls.append("get")
        raise MlflowException(f"{name} not found", error_code=RESOURCE_DOES_NOT_EXIST)

    def delete_registered_model(self, name):
        self.calls.append("delete")
        self.locked = False


def test_a_lock_freed_between_create_and_get_is_taken_not_an_error():
    registry = RegistryWhoseHolderLetsGo()
    with promotion_lock(registry, "gan-mnist"):
        assert registry.locked, "this process holds the lock inside the block"
    assert registry.calls == ["create", "get", "create", "delete"] and not registry.locked
