"""What ``gearbox setup-app`` calls (a quickstarted project's ``websetup``): configure the
application, create its tables from the model, and record every evolution as applied."""
from tg import config

import tgext.evolve

from .config.app_cfg import base_config


def setup_app(command, conf, vars):
    base_config.setup(base_config.configure(conf.global_conf, conf.local_conf))
    # init_model created the tables (the model is current): nothing old needs evolving.
    tgext.evolve.baseline(config)
