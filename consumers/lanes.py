"""Lanes of the annotation worker: which request topics it reads, the lane of each, and the rule that
moves a request between lanes (all from ``schemas.topology``). Light on imports: the runtime tests'
echo worker uses it too."""

from __future__ import annotations

from typing import Any

from consumers.settings import Settings
from schemas.annotation import lane_of
from schemas.topology import BY_KEY, request_topics


def annotation_lanes(settings: Settings) -> dict[str, Any]:
    """The Pipeline fields of the annotation lanes, from ``schemas.topology``: the request topics, the
    lane of each, the interactive budget, and the rule that moves a request between lanes."""
    w = settings.worker
    decls = request_topics("annotation")
    max_images = w.interactive_max_images
    return {
        "input_topic": decls[0].name(w),
        "extra_input_topics": [d.name(w) for d in decls[1:]],
        "output_topic": BY_KEY[decls[0].output_key or ""].name(w),
        "topic_lanes": {d.name(w): d.lane or "bulk" for d in decls},
        "lane_budgets": {"interactive": w.interactive_max_in_flight},
        "lane_for": lambda body, topic_lane: lane_of(body, topic_lane, max_images),
        "with_lane": lambda request, lane: request.model_copy(update={"priority": lane}),
    }
