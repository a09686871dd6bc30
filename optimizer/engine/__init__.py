"""The engine: a model and what is done to it — loading, directions, profiles, steering, scoring, baking.

Nothing here knows of Optuna or a database; everything takes and returns models, arrays and
frozen dataclasses.
"""
