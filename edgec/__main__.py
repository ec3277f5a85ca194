from edgec.cli import app

if __name__ == "__main__":  # not when a worker process (edgec.lower.ahead) imports the main module again
    app(prog_name="edgec")
