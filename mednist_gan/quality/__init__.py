"""How good a generator is: the feature extractors, the metrics, the scores and the ``evaluate`` command."""
