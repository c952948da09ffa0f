"""The application's root controller."""
from tg import TGController, expose


class RootController(TGController):
    @expose()
    def index(self):
        return 'cliapp'
