from gvsl.cli.main import app

app(prog_name="gvsl")
