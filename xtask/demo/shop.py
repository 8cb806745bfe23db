"""The demo's Flask app (`cargo xtask demo`): a small shop with no
instrumentation at all. Its metrics come from flask-ebpf-exporter."""
import time

from flask import Blueprint, Flask, abort

app = Flask(__name__)
catalog = Blueprint("catalog", __name__, url_prefix="/catalog")


@app.get("/")
def index():
    return "welcome\n"


@catalog.get("/items/<int:item_id>")
def item(item_id):
    if item_id > 100:
        abort(404)
    return {"id": item_id}


@catalog.get("/search")
def search():
    time.sleep(0.02)
    return {"results": []}


@app.post("/orders")
def order():
    return {"status": "created"}, 201


@app.get("/checkout")
def checkout():
    raise RuntimeError("payment service unreachable: a 500, on purpose")


app.register_blueprint(catalog)
