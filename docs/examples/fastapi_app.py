"""A FastAPI front for qbgw: POST /jobs queues a job (202 + Location), GET /jobs/{id} reads it.

qbgw's calls are synchronous. These endpoints are plain `def`, so FastAPI runs them in its
threadpool; the `async def` variant at the end hands the call to the threadpool itself.

Run: pip install fastapi uvicorn && uvicorn fastapi_app:app   (a `qbgw worker` runs the jobs)
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Header, HTTPException, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

import qbgw

app = FastAPI()
ASSISTANT_ID = "65d5f3473d5d68095462165d"
#: Built once, from the QBGW_* environment: the same database and broker as the workers.
SETTINGS = qbgw.Settings.from_env()
FINAL = {"succeeded", "failed", "cancelled"}
UNAVAILABLE = HTTPException(503, "the job queue is unavailable; try again", headers={"Retry-After": "5"})


class JobIn(BaseModel):
    messages: list[dict[str, Any]]
    custom_id: str | None = None


def current_user() -> str:
    """The authenticated principal: it becomes the actor of the job's audit events."""
    return "clinic-app"  # replace with your authentication (a Depends)


def submit(job: JobIn, idempotency_key: str | None) -> str:
    try:
        return qbgw.submit(
            ASSISTANT_ID,
            job.messages,
            custom_id=job.custom_id,
            idempotency_key=idempotency_key,
            actor=current_user(),
            settings=SETTINGS,
        )
    except qbgw.InputError as exc:  # names the field, never echoes the text; nothing was stored
        raise HTTPException(422, str(exc)) from None
    except qbgw.NotAnnounced as exc:  # stored; the sweeper announces it: still accepted
        return exc.job_id
    except (qbgw.StoreUnavailable, qbgw.BrokerUnavailable):
        raise UNAVAILABLE from None


@app.post("/jobs", status_code=202)
def create_job(job: JobIn, response: Response, idempotency_key: str | None = Header(None)) -> dict[str, str]:
    job_id = submit(job, idempotency_key)
    response.headers["Location"] = app.url_path_for("read_job", job_id=job_id)
    return {"id": job_id}


@app.get("/jobs/{job_id}")
def read_job(job_id: str, response: Response) -> dict[str, Any]:
    try:
        status = qbgw.job_status(job_id, settings=SETTINGS)  # no PHI read: cheap, not audited
        if status not in FINAL:
            response.headers["Retry-After"] = "1"
            return {"id": job_id, "status": status}
        view = qbgw.get_job(job_id, reader=current_user(), settings=SETTINGS)  # an audited read
    except qbgw.JobNotFound:
        raise HTTPException(404, "no such job") from None
    except qbgw.StoreUnavailable:
        raise UNAVAILABLE from None
    return {
        "id": view.id,
        "status": view.status,
        "answer": view.answer,
        "error": view.error,
        "error_class": view.error_class,
        "attempts": view.attempts,
    }


# The same POST as an `async def` endpoint: the synchronous call goes to the threadpool, so the
# event loop keeps serving other requests while it commits and publishes.
@app.post("/async/jobs", status_code=202)
async def create_job_async(
    job: JobIn, response: Response, idempotency_key: str | None = Header(None)
) -> dict[str, str]:
    job_id = await run_in_threadpool(submit, job, idempotency_key)
    response.headers["Location"] = app.url_path_for("read_job", job_id=job_id)
    return {"id": job_id}
