"""docs/configuration.md is generated from the settings' declarations and kept current; every setting says
what it does."""

from consumers.settings import KafkaSettings, WorkerSettings
from consumers.settings_doc import COMMAND, DOC_PATH, render


def test_every_setting_has_a_description():
    missing = [name for model in (KafkaSettings, WorkerSettings) for name, field in model.model_fields.items()
               if not (field.description or "").strip()]
    assert missing == [], f"give these settings a description= in consumers/settings.py: {missing}"


def test_the_configuration_page_is_current():
    assert DOC_PATH.read_text() == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_the_page_names_every_environment_variable():
    text = render()
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "CLS_CLIP_VARIANT", "CLS_MAX_IMAGES_PER_REQUEST", "AWS_ENDPOINT_URL"):
        assert f"`{name}`" in text
    assert "`ViT-B-32`" in text and "`10000`" in text  # defaults come from the declarations
