"""The one builder of the series :class:`~inference.selection.Selector`: completion, worker, ``explain``, ``predict``.

Readiness (completion), the analysis (worker), the dry run (``fpe-node explain``) and the offline
prediction (``fpe-node predict``) must judge a study by the same rules, or a study is queued by
one rule set and refused by another (an NCCT-only study queued, reported "not analysed", then
re-opened when its CTA arrives: two results). Every caller builds its selector here, from the
settings (``inference.selection_rules``, ``inference.case_window_h``,
``inference.prefer_pipeline``) and the roles the served recipe requires
(:attr:`inference.recipe.PipelineRecipe.required_roles`).
"""

from __future__ import annotations

from collections.abc import Mapping

from dicom_node.settings import Settings
from inference.recipe import DEFAULT_RECIPE, Recipe
from inference.result import Pipeline, Role
from inference.selection import PIPELINES, Selector, load_selection_rules


def served_recipe(settings: Settings) -> Recipe:
    """The recipe the worker will serve: the configured checkpoint's, else the default recipe.

    The same rule as :class:`inference.predictor.Predictor` (it is called), without building the
    network on a device.

    Raises
    ------
    inference.model.checkpoint.CheckpointError
        When the configured checkpoint cannot be read.
    """
    if settings.inference.checkpoint is None:
        return DEFAULT_RECIPE
    from inference.model.checkpoint import load_checkpoint
    from inference.predictor import Predictor

    return Predictor.recipe_of(load_checkpoint(settings.inference.checkpoint))


def required_roles(recipe: Recipe) -> dict[Pipeline, tuple[Role, ...]]:
    """Per pipeline, the roles ``recipe`` cannot do without."""
    return {pipeline: tuple(recipe.for_pipeline(pipeline).required_roles) for pipeline in PIPELINES}


def build_selector(settings: Settings, recipe: Recipe | None = None, *, rules_only: bool = False) -> Selector:
    """The node's selector.

    Parameters
    ----------
    settings:
        The node's settings (rules file, case window, pipeline preference).
    recipe:
        The served recipe (the worker and ``predict`` pass their predictor's); None:
        :func:`served_recipe`.
    rules_only:
        Use the rules file's ``required`` lists instead of the recipe's (``explain --rules-only``).

    Raises
    ------
    ValueError
        (pydantic ``ValidationError`` included) for a bad rules file.
    """
    inference = settings.inference
    roles: Mapping[Pipeline, tuple[Role, ...]] | None = None
    if not rules_only:
        roles = required_roles(recipe if recipe is not None else served_recipe(settings))
    return Selector(
        load_selection_rules(inference.selection_rules),
        case_window_h=inference.case_window_h,
        prefer_pipeline=inference.prefer_pipeline,
        required_roles=roles,
    )
