"""The Functions app: registers the blueprints and tunes the interpreter, nothing else (no I/O at
import time)."""

import azure.functions as func

from functions.alerts import bp as alerts_blueprint
from functions.health import bp as health_blueprint
from functions.maps import bp as maps_blueprint
from functions.retention import bp as retention_blueprint
from functions.sync import bp as sync_blueprint
from shared_code.bootstrap import tune_interpreter

tune_interpreter()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(alerts_blueprint)
app.register_functions(sync_blueprint)
app.register_functions(health_blueprint)
app.register_functions(maps_blueprint)
app.register_functions(retention_blueprint)
