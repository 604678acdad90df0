from bgservice.cli import main

main()
