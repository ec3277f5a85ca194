from edgec.cli import app

app(prog_name="edgec")
