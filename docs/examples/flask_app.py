"""A Flask front for qbgw: POST /jobs queues a job (202 + Location), GET /jobs/<id> reads it.

Run: pip install flask && flask --app flask_app run   (a `qbgw worker` runs the jobs)
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request, url_for

import qbgw

app = Flask(__name__)
ASSISTANT_ID = "65d5f3473d5d68095462165d"
#: Built once, from the QBGW_* environment: the same database and broker as the workers.
SETTINGS = qbgw.Settings.from_env()
FINAL = {"succeeded", "failed", "cancelled"}


def current_user() -> str:
    """The authenticated principal: it becomes the actor of the job's audit events."""
    return "clinic-app"  # replace with your authentication


@app.post("/jobs")
def create_job() -> Any:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return jsonify(error="the body must be a JSON object"), 400
    try:
        job_id = qbgw.submit(
            ASSISTANT_ID,
            body.get("messages"),
            custom_id=body.get("custom_id"),
            idempotency_key=request.headers.get("Idempotency-Key"),
            actor=current_user(),
            settings=SETTINGS,
        )
    except qbgw.InputError as exc:  # names the field, never echoes the text; nothing was stored
        return jsonify(error=str(exc)), 422
    except qbgw.NotAnnounced as exc:  # stored; the sweeper announces it: still accepted
        job_id = exc.job_id
    except (qbgw.StoreUnavailable, qbgw.BrokerUnavailable):
        return jsonify(error="the job queue is unavailable; try again"), 503, {"Retry-After": "5"}
    return jsonify(id=job_id), 202, {"Location": url_for("read_job", job_id=job_id)}


@app.get("/jobs/<job_id>")
def read_job(job_id: str) -> Any:
    try:
        status = qbgw.job_status(job_id, settings=SETTINGS)  # no PHI read: cheap, not audited
        if status not in FINAL:
            return jsonify(id=job_id, status=status), 200, {"Retry-After": "1"}
        view = qbgw.get_job(job_id, reader=current_user(), settings=SETTINGS)  # an audited read
    except qbgw.JobNotFound:
        return jsonify(error="no such job"), 404
    except qbgw.StoreUnavailable:
        return jsonify(error="the job store is unavailable; try again"), 503, {"Retry-After": "5"}
    return jsonify(
        id=view.id,
        status=view.status,
        answer=view.answer,
        error=view.error,
        error_class=view.error_class,
        attempts=view.attempts,
    )
