fw sam -t 3600 -l long_noalert -J src 192.0.2.2; echo "samgate-rule 0 $?"
fw6 sam -t 60 -I any 2001:db8::1; echo "samgate-rule 1 $?"
fw sam -M -j src 192.0.2.2; echo "samgate-rule 2 $?"
fw sam -C -t 3600 -l long_noalert -J src 192.0.2.2 2>&1
