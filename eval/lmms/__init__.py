"""lmms-eval integration: the registered ``vtprune`` model (``plugin``), its ``model_args`` (``args``), the runner
behind ``vtprune eval --model`` (``runner``), the offline tasks' stored documents (``docs``) and task folders
(``tasks/``, lmms-eval's ``--include_path``)."""
