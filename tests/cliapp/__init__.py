"""A small but real TurboGears application for the ``gearbox evolve`` tests.

Laid out like a quickstarted project (``config/app_cfg.py`` holds ``base_config``,
``config/application.py`` the ``make_app`` factory its .ini names), with three evolutions whose
side effects are rows of ``cliapp_effects``.  The tests put ``tests/`` on ``PYTHONPATH`` and
write the .ini themselves.
"""
