from skyhop.cli import main

main()
