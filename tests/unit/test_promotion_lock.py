"""The registry lock's races on a busy MLflow server: its holder lets go between a failed create and the look at who
holds it; MLflow's client retries a delete or a create whose answer was lost, and the retry finds the lock gone or
already there."""

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


class RegistryThatLosesTheDeleteAnswer(RegistryWhoseHolderLetsGo):
    """The lock is free; deleting it succeeds on the server, but the client's retry is told it does not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.locked = False

    def delete_registered_model(self, name):
        super().delete_registered_model(name)
        raise MlflowException(f"{name} not found", error_code=RESOURCE_DOES_NOT_EXIST)


def test_a_release_whose_retry_finds_the_lock_gone_ends_the_registration_cleanly():
    registry = RegistryThatLosesTheDeleteAnswer()
    with promotion_lock(registry, "gan-mnist"):
        assert registry.locked
    assert registry.calls == ["create", "delete"] and not registry.locked


class RegistryThatLosesTheCreateAnswer(RegistryThatLosesTheDeleteAnswer):
    """Creating the lock succeeds on the server, but the client's retry is told it already exists."""

    def create_registered_model(self, name, tags, description):
        self.calls.append("create")
        self.locked, self.tags = True, tags
        raise MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS)

    def get_registered_model(self, name):
        self.calls.append("get")
        return type("RegisteredModel", (), {"tags": self.tags})()


def test_a_lock_this_process_created_is_recognised_as_its_own():
    registry = RegistryThatLosesTheCreateAnswer()
    with promotion_lock(registry, "gan-mnist", timeout=5):
        assert registry.locked
    assert registry.calls == ["create", "get", "delete"] and not registry.locked
