"""``/api/v1/schedules``: recurring jobs over HTTP, the same operations as the
``queue:schedule*`` commands (docs/http.md), in AIP style: List, Get, Create, Delete,
and the custom methods ``:pause``, ``:resume`` and ``:run``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bgservice.errors import Busy, UnknownRequest
from bgservice.http import inputs
from bgservice.http.guard import Routes
from bgservice.queue.engine import JobQueue
from bgservice.queue.scheduler import Scheduler
from bgservice.queue.schedules import make_schedule

SCHEDULES = "/api/v1/schedules"
SCHEDULE = f"{SCHEDULES}/{{name:[^/:]+}}"


class ScheduleRoutes:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def add_to(self, routes: Routes) -> None:
        routes.get(SCHEDULES, self.list)
        routes.post(SCHEDULES, self.create)
        routes.get(SCHEDULE, self.get)
        routes.delete(SCHEDULE, self.delete)
        routes.post(f"{SCHEDULE}:pause", self.pause)
        routes.post(f"{SCHEDULE}:resume", self.resume)
        routes.post(f"{SCHEDULE}:run", self.run)

    def _scheduler(self) -> Scheduler:
        if self.queue.scheduler is None:
            raise Busy("Schedules not loaded yet")
        return self.queue.scheduler

    def _one(self, request: web.Request) -> dict[str, Any]:
        return self._scheduler().describe_one(request.match_info["name"])  # (404: named)

    async def list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"schedules": self._scheduler().describe()})

    async def get(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._one(request))

    async def create(self, request: web.Request) -> web.StreamResponse:
        values, data = inputs.schedule_body(await inputs.json_body(request))
        schedule = make_schedule(values, data)
        try:
            made = await self._scheduler().put(schedule, inputs.caller(request),
                                               "paused" in values)  # fmt: skip
        except UnknownRequest:
            raise inputs.unknown_module(schedule.module) from None
        location = {"Location": f"schedules/{made['name']}"}  # (relative: docs/http.md)
        return web.json_response(made, status=201, headers=location)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        await self._scheduler().remove(request.match_info["name"])
        return web.json_response({})

    async def pause(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._scheduler().pause(request.match_info["name"], True))

    async def resume(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self._scheduler().pause(request.match_info["name"], False))

    async def run(self, request: web.Request) -> web.StreamResponse:
        scheduler = self._scheduler()
        schedule = scheduler.named(request.match_info["name"])
        try:
            jid = await scheduler.fire_now(schedule.name, inputs.caller(request))
        except UnknownRequest:  # (its module was removed since)
            raise inputs.unknown_module(schedule.module) from None
        return web.json_response({"id": jid}, status=201, headers={"Location": f"../jobs/{jid}"})
