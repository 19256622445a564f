from featuremaps.cli import main

main()
