"""The schedules routes: create, read, change, pause, resume, run now, the fire ledger, a preview."""

from __future__ import annotations


def test_a_schedule_is_created_read_changed_paused_run_and_deleted(client):
    created = client.post("/api/schedules", {"name": "nightly", "actor": "echo", "cron": "0 3 * * *",
                                             "timezone": "Europe/Berlin", "args": [1]})  # fmt: skip
    assert created.status == 201 and created.headers["Location"] == "/api/schedules/nightly"
    assert created.json["origin"] == "api" and created.json["next_fire_time"].endswith(("+01:00", "+02:00"))
    assert client.post("/api/schedules", {"name": "nightly", "actor": "echo", "cron": "* * * * *"}).status == 409
    assert [s["name"] for s in client.get("/api/schedules").json["schedules"]] == ["nightly"]
    preview = client.get("/api/schedules/nightly/preview?count=3").json
    assert len(preview["fire_times"]) == 3 and all("T03:00:00" in t for t in preview["fire_times"])
    changed = client.request("PATCH", "/api/schedules/nightly", {"cron": "30 4 * * *"}).json
    assert changed["cron"] == "30 4 * * *" and changed["timezone"] == "Europe/Berlin" and changed["args"] == [1]
    paused = client.request("PATCH", "/api/schedules/nightly", {"enabled": False}).json
    assert paused["enabled"] is False and paused["next_fire_time"] is None
    assert client.request("PATCH", "/api/schedules/nightly", {"enabled": True}).json["next_fire_time"]
    run = client.post("/api/schedules/nightly/run")
    assert run.status == 202 and run.json["schedule"] == "nightly" and run.json["fire_time"] is None
    assert [job["id"] for job in client.get("/api/jobs?schedule=nightly").json["jobs"]] == [run.json["id"]]
    assert client.get("/api/schedules/nightly/fires").json == {"schedule": "nightly", "fires": []}
    deleted = client.request("DELETE", "/api/schedules/nightly")
    assert deleted.status == 204 and deleted.body == b""
    assert client.get("/api/schedules/nightly").json["error"]["code"] == "schedule_not_found"
    assert client.get(f"/api/jobs/{run.json['id']}").status == 200  # its jobs stay


def test_schedule_errors_name_the_field(client):
    bad_cron = client.post("/api/schedules", {"name": "x", "actor": "echo", "cron": "every day"})
    assert bad_cron.status == 422 and bad_cron.json["error"]["fields"][0]["field"] == "cron"
    bad_zone = client.post("/api/schedules", {"name": "x", "actor": "echo", "cron": "* * * * *", "timezone": "Mars/Base"})
    assert bad_zone.status == 422 and bad_zone.json["error"]["fields"][0]["field"] == "timezone"
    bad_name = client.post("/api/schedules", {"name": "Not OK", "actor": "echo", "cron": "* * * * *"})
    assert bad_name.status == 422 and bad_name.json["error"]["fields"][0]["field"] == "name"
    unknown = client.post("/api/schedules", {"name": "x", "actor": "nobody", "cron": "* * * * *"})
    assert unknown.status == 422 and unknown.json["error"]["fields"][0]["field"] == "actor"
    for method, path in (("GET", "/api/schedules/none"), ("POST", "/api/schedules/none/run"),
                         ("GET", "/api/schedules/none/fires"), ("GET", "/api/schedules/none/preview"),
                         ("DELETE", "/api/schedules/none")):  # fmt: skip
        assert client.request(method, path).status == 404, path
    assert client.request("PATCH", "/api/schedules/none", {"enabled": False}).status == 404
