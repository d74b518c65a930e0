from sd_rest.cli import main

main(prog_name="stable-diffusion-rest-api")
