"""The WSGI application factory: ``use = call:cliapp.config.application:make_app``."""
from .app_cfg import base_config


def make_app(global_conf, **app_conf):
    return base_config.make_wsgi_app(global_conf, app_conf)
