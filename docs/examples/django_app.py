"""A Django front for qbgw in one file: POST /jobs queues a job (202 + Location), GET /jobs/<id> reads it.
In a project, the views go in views.py and the paths in urls.py.

Run: pip install django && python django_app.py runserver   (a `qbgw worker` runs the jobs)
"""

from __future__ import annotations

import json
import sys

from django.conf import settings

settings.configure(
    ROOT_URLCONF=__name__, ALLOWED_HOSTS=["localhost", "127.0.0.1", "testserver"], SECRET_KEY="replace-me", DEBUG=False
)

from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path, reverse  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402

import qbgw  # noqa: E402

ASSISTANT_ID = "65d5f3473d5d68095462165d"
#: Built once, from the QBGW_* environment: the same database and broker as the workers.
SETTINGS = qbgw.Settings.from_env()
FINAL = {"succeeded", "failed", "cancelled"}


def current_user(request: HttpRequest) -> str:
    """The authenticated principal: it becomes the actor of the job's audit events."""
    return "clinic-app"  # e.g. request.user.get_username() with django.contrib.auth


@csrf_exempt  # an API called with a token, not a browser form
@require_POST
def create_job(request: HttpRequest) -> JsonResponse:
    try:
        body = json.loads(request.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return JsonResponse({"error": "the body must be a JSON object"}, status=400)
    try:
        job_id = qbgw.submit(
            ASSISTANT_ID,
            body.get("messages"),
            custom_id=body.get("custom_id"),
            idempotency_key=request.headers.get("Idempotency-Key"),
            actor=current_user(request),
            settings=SETTINGS,
        )
    except qbgw.InputError as exc:  # names the field, never echoes the text; nothing was stored
        return JsonResponse({"error": str(exc)}, status=422)
    except qbgw.NotAnnounced as exc:  # stored; the sweeper announces it: still accepted
        job_id = exc.job_id
    except (qbgw.StoreUnavailable, qbgw.BrokerUnavailable):
        return JsonResponse(
            {"error": "the job queue is unavailable; try again"}, status=503, headers={"Retry-After": "5"}
        )
    return JsonResponse({"id": job_id}, status=202, headers={"Location": reverse("read_job", args=[job_id])})


@require_GET
def read_job(request: HttpRequest, job_id: str) -> JsonResponse:
    try:
        status = qbgw.job_status(job_id, settings=SETTINGS)  # no PHI read: cheap, not audited
        if status not in FINAL:
            return JsonResponse({"id": job_id, "status": status}, headers={"Retry-After": "1"})
        view = qbgw.get_job(job_id, reader=current_user(request), settings=SETTINGS)  # an audited read
    except qbgw.JobNotFound:
        return JsonResponse({"error": "no such job"}, status=404)
    except qbgw.StoreUnavailable:
        return JsonResponse(
            {"error": "the job store is unavailable; try again"}, status=503, headers={"Retry-After": "5"}
        )
    return JsonResponse(
        {
            "id": view.id,
            "status": view.status,
            "answer": view.answer,
            "error": view.error,
            "error_class": view.error_class,
            "attempts": view.attempts,
        }
    )


urlpatterns = [
    path("jobs", create_job, name="create_job"),
    path("jobs/<str:job_id>", read_job, name="read_job"),
]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
