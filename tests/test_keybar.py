"""KeyBar, the dashboard's footer, in a real Textual app driven by Pilot."""

from __future__ import annotations

import asyncio

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Input

from app.dashboard.keybar import KeyBar


class KeysApp(App[None]):
    AUTO_FOCUS = None
    BINDINGS = [  # noqa: RUF012 (Textual declares it so)
        Binding("x", "mark('x')", "mark x"),
        Binding("plus", "mark('+')", "more"),
        Binding("y", "mark('hidden')", "not shown", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[str] = []

    def compose(self) -> ComposeResult:
        yield Input(id="box")
        yield KeyBar()

    def action_mark(self, what: str) -> None:
        self.marks.append(what)


def test_shows_the_keys_that_work_now_and_a_click_presses_one() -> None:
    async def main() -> None:
        app = KeysApp()
        async with app.run_test(size=(80, 5)) as pilot:
            bar = app.query_one(KeyBar)
            await pilot.pause()
            line = bar.render().plain
            assert " x mark x " in line and " + more " in line and "not shown" not in line
            assert line.rstrip().endswith("^p palette")
            # A click on "x mark x" presses x.
            start = line.index(" x mark x ")
            await pilot.click(KeyBar, offset=(start + 3, 0))
            assert app.marks == ["x"]
            # In the input box, letters are typed, not run: the bar drops them, repaints only.
            renders = []
            original = bar.render

            def counted():  # type: ignore[no-untyped-def]
                renders.append(1)
                return original()

            bar.render = counted  # type: ignore[method-assign]
            app.query_one("#box", Input).focus()
            await pilot.pause()
            await pilot.pause()
            assert renders and " x mark x " not in bar.render().plain
            await pilot.press("x")
            assert app.marks == ["x"] and app.query_one("#box", Input).value == "x"

    asyncio.run(main())
