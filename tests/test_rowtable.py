"""RowTable on its own, in a real Textual app driven by Pilot: diffing, cursor, caching."""

from __future__ import annotations

import asyncio

from rich.text import Text
from textual.app import App, ComposeResult

from app.dashboard.format import Row
from app.dashboard.lineview import TextPane
from app.dashboard.rowtable import RowTable


def row(key: int, *cells: str) -> Row:
    return (str(key), tuple(Text(c) for c in (str(key), *cells)))


def rows(n: int, tag: str = "x") -> list[Row]:
    return [row(i, f"{tag}{i}", "last column") for i in range(n)]


class TableApp(App[None]):
    def __init__(self) -> None:
        super().__init__()
        self.highlighted: list[str | None] = []
        self.selected: list[str | None] = []

    def compose(self) -> ComposeResult:
        yield RowTable(("id", "name", "info"), {"id": 4, "name": 8, "info": 10}, id="t")

    def on_row_table_row_highlighted(self, event: RowTable.RowHighlighted) -> None:
        self.highlighted.append(event.key)

    def on_row_table_row_selected(self, event: RowTable.RowSelected) -> None:
        self.selected.append(event.key)


def screen_text(app: App[None]) -> list[str]:
    table = app.query_one(RowTable)
    return [table.render_line(y).text.rstrip() for y in range(table.size.height)]


def drive(test) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        app = TableApp()
        async with app.run_test(size=(60, 8)) as pilot:
            app.query_one(RowTable).focus()
            await test(app, pilot)

    asyncio.run(main())


def test_renders_header_and_rows_with_truncation() -> None:
    async def test(app: TableApp, pilot) -> None:  # type: ignore[no-untyped-def]
        table = app.query_one(RowTable)
        table.apply([row(1, "a-very-long-name", "info"), row(2, "b", "c")])
        await pilot.pause()
        lines = screen_text(app)
        assert lines[0].split() == ["id", "name", "info"]
        assert lines[1].split() == ["1", "a-very-…", "info"]
        assert lines[2].split() == ["2", "b", "c"]
        assert len(lines) == 3  # height auto: the header and the rows

    drive(test)


def test_only_changed_rows_are_rendered_again() -> None:
    async def test(app: TableApp, pilot) -> None:  # type: ignore[no-untyped-def]
        table = app.query_one(RowTable)
        assert table.apply(rows(5)) is True
        await pilot.pause()
        first = table.rendered
        assert first == 5
        changed = rows(5)
        changed[3] = row(3, "new", "last column")
        assert table.apply(changed) is False  # same keys, same order: not structural
        await pilot.pause()
        assert table.rendered == first + 1
        assert screen_text(app)[4].split()[1] == "new"
        assert table.apply(changed) is False
        await pilot.pause()
        assert table.rendered == first + 1  # nothing changed: nothing rendered

    drive(test)


def test_cursor_follows_its_key_and_the_view_follows_the_cursor() -> None:
    async def test(app: TableApp, pilot) -> None:  # type: ignore[no-untyped-def]
        table = app.query_one(RowTable)
        table.apply(rows(20))
        await pilot.pause()
        for _ in range(10):
            await pilot.press("down")
        assert table.selected_key == "10"
        # Eight lines: the header and seven rows; row 10 is the last line in view.
        assert round(table.scroll_y) == 4
        assert screen_text(app)[-1].split()[0] == "10"
        # Rows before it leave: the cursor stays on job 10.
        assert table.apply(rows(20)[8:]) is True
        assert table.selected_key == "10" and table.cursor_row == 2
        # Job 10 leaves: the cursor keeps its position, on the next job.
        assert table.apply([r for r in rows(20)[8:] if r[0] != "10"]) is True
        await pilot.pause()
        assert table.selected_key == "11"
        assert app.highlighted[-1] == "11"
        await pilot.press("end")
        assert table.selected_key == "19"
        await pilot.press("home")
        assert table.selected_key == "8" and round(table.scroll_y) == 0
        await pilot.press("enter")
        await pilot.pause()
        assert app.selected == ["8"]
        table.apply([])
        assert table.selected_key is None and table.row_count == 0

    drive(test)


def test_click_moves_the_cursor_without_selecting() -> None:
    async def test(app: TableApp, pilot) -> None:  # type: ignore[no-untyped-def]
        table = app.query_one(RowTable)
        table.apply(rows(5))
        await pilot.pause()
        await pilot.click(RowTable, offset=(2, 3))  # line 3: the third row
        assert table.selected_key == "2"
        assert app.selected == []

    drive(test)


class PaneApp(App[None]):
    def compose(self) -> ComposeResult:
        yield TextPane(id="pane")


def test_text_pane_scrolls_long_content_and_updates_without_a_layout_pass() -> None:
    async def main() -> None:
        app = PaneApp()
        async with app.run_test(size=(40, 6)) as pilot:
            pane = app.query_one(TextPane)
            pane.update(Text("\n".join(f"line {i}" for i in range(20))))
            await pilot.pause()
            assert pane.render_line(0).text.rstrip() == "line 0"
            assert pane.virtual_size.height == 20 and pane.max_scroll_y == 14
            pane.scroll_to(y=14, animate=False, immediate=True)
            await pilot.pause()
            assert pane.render_line(5).text.rstrip() == "line 19"
            # New content of another height: back to the top, and the screen is not laid out.
            layouts: list[object] = []
            screen = app.screen
            original = screen._refresh_layout

            def counted(*args: object, **kwargs: object) -> None:
                layouts.append(args)
                original(*args, **kwargs)  # type: ignore[arg-type]

            screen._refresh_layout = counted  # type: ignore[method-assign]
            pane.update(Text("short\ntext\nwith a line long enough to be wrapped at forty columns"))
            await pilot.pause()
            await pilot.pause()
            assert layouts == []
            assert pane.scroll_y == 0 and pane.virtual_size.height == 4
            lines = [pane.render_line(y).text.rstrip() for y in range(4)]
            assert lines == [
                "short",
                "text",
                "with a line long enough to be wrapped",
                "at forty columns",
            ]
            assert pane.content.plain.startswith("short")  # type: ignore[union-attr]

    asyncio.run(main())
