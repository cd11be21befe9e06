"""Shared fixtures: one real Kafka broker and one real S3 API server per session, a local image
server, and a trained model shared by the tests that need one."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.s3",
    "tests.fixtures.http_server",
    "tests.fixtures.trained_model",
]


_DESELECTED_CUDA: list[str] = []


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_report_header(config):  # type: ignore[no-untyped-def]
    if _cuda_available():
        import torch

        return f"cuda: {torch.cuda.get_device_name()} (tests marked cuda run)"
    return "cuda: not available - tests marked cuda are deselected (bench/device_check.sh runs them on a GPU)"


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Without CUDA, deselect the ``cuda`` tests (said in the header and the summary, never silently)."""
    if _cuda_available():
        return
    cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda:
        _DESELECTED_CUDA.extend(item.nodeid for item in cuda)
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _DESELECTED_CUDA:
        terminalreporter.write_line(
            f"cuda: {len(_DESELECTED_CUDA)} CUDA tests deselected: no CUDA device here "
            "(run bench/device_check.sh on a GPU machine)", yellow=True)
